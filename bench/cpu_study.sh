#!/usr/bin/env bash
# The CPU-scale real-data studies of docs/results.md, one run at a time per CPU core (two runs on two
# cores with two threads each slow each other several-fold).
#   STUDY=cifar10 (default): CIFAR-10-LT JPEGs at 32x32. Needs the JPEGs in $DATA
#     (default /tmp/cifar10): mkdir -p /tmp/cifar10 && tar -xzf cifar10-jpeg.tar.gz -C /tmp/cifar10
#   STUDY=digits: the regime where semi-supervision pays: bundled digits at 8x8, no download,
#     one thread per run ($THREADS, default 1), so two sections can run side by side on two cores.
# Usage: [STUDY=digits] bench/cpu_study.sh OUT_DIR [section ...]
#   sections: imwa0 imwa1 imwa2 (per seed), algorithms0 algorithms1 algorithms2, acr0 acr1 acr2 (ACR with
#   the official code's estimate), precision (cifar10 only); digits only: table0 table1 table2 (every
#   algorithm on consistent, reversed and uniform unlabeled data, per seed) and top0 top1 top2 (IMWA K=2 E=4,
#   MWA K=2 E=1 and the compute-matched K=1 on top of the algorithms named in $TOP, on $TOP_DATA, default
#   consistent)
# A run whose results.json exists is skipped, so the script can be restarted; copies of it may run side by
# side on one OUT (a run is claimed by OUT/<run>.lock; remove the locks a killed copy left before restarting).
set -uo pipefail
OUT=${1:?usage: [STUDY=digits] bench/cpu_study.sh OUT_DIR [section ...]}
shift
STUDY=${STUDY:-cifar10}
cd "$(dirname "$0")/.."
# A preset sets no recipe key; the studies' common protocol departs from the recipes here, visibly:
# EMA 0.999 with warm-up and BN momentum 0.01 for every arm (the papers' 0.001 assumes 250k steps; after
# 1,600 steps it would leave (1 - 0.001)^1600 = 20% of the initial running statistics in the model).
case $STUDY in
  cifar10)
    DATA=${DATA:-/tmp/cifar10}
    SECTIONS=${*:-imwa0 algorithms0 imwa1 algorithms1 imwa2 precision}
    COMMON=(experiment=cpu_cifar10_lt "dataset.root=$DATA" algorithm.ema.warmup=true model.bn_momentum=0.01
            train.precision=bf16 train.channels_last=true train.eval_every=200 train.progress=false train.num_threads=2)
    LONG=3200 ;;  # the compute-matched K=1 arm: twice the 1,600 steps
  digits)
    SECTIONS=${*:-imwa0 algorithms0 acr0 imwa1 algorithms1 acr1 imwa2 algorithms2 acr2}
    # fp32: this machine's AMD cores run bf16 at a sixth of the fp32 speed on 8x8 images (bench.train_step)
    COMMON=(experiment=cpu_digits_lt algorithm.ema.warmup=true model.bn_momentum=0.01
            train.progress=false "train.num_threads=${THREADS:-1}")
    LONG=2000 ;;
  *) echo "unknown STUDY=$STUDY (cifar10 or digits)"; exit 2 ;;
esac

run() {  # several copies of this script may share OUT (one per core): a run is claimed by its lock directory
  local name=$1; shift
  if [ -f "$OUT/$name/results.json" ]; then echo "skip $name (done)"; return; fi
  if ! mkdir "$OUT/$name.lock" 2> /dev/null; then echo "skip $name (claimed: $OUT/$name.lock)"; return; fi
  echo "$(date '+%F %T') start $name (load $(cut -d' ' -f1 /proc/loadavg))"
  python main.py "${COMMON[@]}" "$@" "hydra.run.dir=$OUT/$name" > "$OUT/$name.log" 2>&1 \
    && echo "$(date '+%F %T') done  $name" || echo "$(date '+%F %T') FAILED $name (see $OUT/$name.log)"
  rmdir "$OUT/$name.lock"
}

imwa_arms() {  # supervised, FixMatch K=1, IMWA K=2 E=4, MWA K=2 E=1, FixMatch K=1 with twice the steps, IMWA with TWA
  local s=$1
  run "imwa/supervised_s$s" algorithm=supervised seed="$s"
  run "imwa/fixmatch_k1_s$s" algorithm=fixmatch seed="$s"
  run "imwa/fixmatch_imwa_k2e4_s$s" algorithm=fixmatch imwa.k=2 imwa.episodes=4 seed="$s"
  run "imwa/fixmatch_mwa_k2e1_s$s" algorithm=fixmatch imwa.k=2 imwa.episodes=1 seed="$s"
  run "imwa/fixmatch_k1_t${LONG}_s$s" algorithm=fixmatch train.iterations=$LONG seed="$s"
  # TWA-v needs labeled held-out images: 20 per class, taken before the split (reported as consumed).
  # Not on digits: 20 per class would be more labels than the 36 the arms learn from.
  if [ "$STUDY" = cifar10 ]; then
    run "imwa/fixmatch_imwa_twa_k2e4_s$s" algorithm=fixmatch imwa.k=2 imwa.episodes=4 imwa.merge=twa \
      dataset.val_per_class=20 imwa.twa.steps=50 seed="$s"
  fi
}

algorithm_arms() {  # every algorithm on consistent and reversed unlabeled data
  # (supervised and FixMatch on consistent data are the imwa/ runs of the same seed: same config)
  local s=$1 u tdist
  for u in consistent reversed; do
    if [ "$u" = reversed ]; then
      run "algorithms/supervised_${u}_s$s" algorithm=supervised dataset.unlabeled=$u seed="$s"
      run "algorithms/fixmatch_${u}_s$s" algorithm=fixmatch dataset.unlabeled=$u seed="$s"
    fi
    # DASO: T_dist 1.5 when gamma_l == gamma_u, else 0.3 (Oh et al., CVPR 2022); schedules as fractions of the run
    tdist=1.5; [ "$u" = reversed ] && tdist=0.3
    # DASO with FixMatch's mu=7 and cosine lr (its recipe: mu=2, constant lr), as the study compares them
    run "algorithms/daso_${u}_s$s" algorithm=daso_short dataset.unlabeled=$u algorithm.dist_temperature=$tdist \
      train.mu=7 train.schedule=cosine seed="$s"
    # ACR: its own mu (1) and two strong views; the same disjoint split as the others (its recipe: nested);
    # the paper's reading of the estimate (the acr_official arms have the official code's, now the default)
    run "algorithms/acr_${u}_s$s" algorithm=acr_short dataset.unlabeled=$u dataset.protocol=disjoint \
      algorithm.follow_official_code=false seed="$s"
  done
}

acr_official_arms() {  # ACR with the official code's estimate beside the paper's
  local s=$1 u
  for u in consistent reversed; do
    run "algorithms/acr_official_${u}_s$s" algorithm=acr_short dataset.unlabeled=$u dataset.protocol=disjoint \
      algorithm.follow_official_code=true seed="$s"
  done
}

# The whole table: each algorithm with its recipe (mu, lr schedule, ...) under the common protocol above, on the
# same disjoint split (CDMAD's and ACR's recipes: nested), schedules given in epochs kept at their recipes'
# proportions of the run. CReST chains its 6 generations of 250 steps each: USB's proportion (each generation
# 65,536 steps, a quarter of its other baselines' 262,144), so 1,500 steps in all, 1.5 times the others' compute
# (6 generations of 168 steps, compute-matched, end at 50%: a 168-step model picks wrong pseudo-labels).
declare -A ARMS=(
  [supervised]="algorithm=supervised"
  [fixmatch]="algorithm=fixmatch"
  [daso]="algorithm=daso_short train.mu=7 train.schedule=cosine"
  [acr]="algorithm=acr_short dataset.protocol=disjoint"
  [debiaspl]="algorithm=debiaspl"
  [saw]="algorithm=saw algorithm.epoch_length=0.00390625"
  [darp]="algorithm=darp"
  [abc]="algorithm=abc"
  [adsh]="algorithm=adsh algorithm.epoch_length=0.00390625"
  [tras]="algorithm=tras"
  [crest]="algorithm=crest train.iterations=250"
  [crest_plus]="algorithm=crest_plus train.iterations=250"
  [cossl]="algorithm=cossl"
  [simpro]="algorithm=simpro algorithm.epoch_length=0.0116"
  [cdmad]="algorithm=cdmad dataset.protocol=disjoint"
)
# $TABLE_ALGORITHMS (space-separated) runs only those arms
read -r -a TABLE <<< "${TABLE_ALGORITHMS:-supervised fixmatch daso acr debiaspl saw darp abc adsh tras crest crest_plus cossl simpro cdmad}"

arm() {  # the arm's overrides for unlabeled setting $2 (DASO's T_dist: 1.5 when gamma_l == gamma_u, else 0.3)
  local name=$1 u=$2
  echo "${ARMS[$name]}"
  if [ "$name" = daso ]; then [ "$u" = consistent ] && echo algorithm.dist_temperature=1.5 || echo algorithm.dist_temperature=0.3; fi
}

table_arms() {
  local s=$1 u name
  for u in consistent reversed uniform; do
    for name in "${TABLE[@]}"; do
      # shellcheck disable=SC2046
      run "table/${name}_${u}_s$s" $(arm "$name" "$u") dataset.unlabeled=$u seed="$s"
    done
  done
}

top_arms() {  # IMWA, MWA and the compute-matched K=1 (twice the steps) on top of each algorithm in $TOP
  local s=$1 u name steps
  for u in ${TOP_DATA:-consistent}; do
    for name in ${TOP:?set TOP to the algorithms to build on, e.g. TOP="acr saw darp"}; do
      steps=1000; [[ "$name" == crest* ]] && steps=250
      # shellcheck disable=SC2046
      run "top/${name}_imwa_k2e4_${u}_s$s" $(arm "$name" "$u") dataset.unlabeled=$u imwa.k=2 imwa.episodes=4 seed="$s"
      # shellcheck disable=SC2046
      run "top/${name}_mwa_k2e1_${u}_s$s" $(arm "$name" "$u") dataset.unlabeled=$u imwa.k=2 imwa.episodes=1 seed="$s"
      # shellcheck disable=SC2046
      run "top/${name}_k1_long_${u}_s$s" $(arm "$name" "$u") dataset.unlabeled=$u train.iterations=$((2 * steps)) seed="$s"
    done
  done
}

mkdir -p "$OUT/imwa" "$OUT/algorithms" "$OUT/precision" "$OUT/table" "$OUT/top"
for section in $SECTIONS; do
  case $section in
    imwa0|imwa1|imwa2) imwa_arms "${section#imwa}" ;;
    algorithms0|algorithms1|algorithms2) algorithm_arms "${section#algorithms}" ;;
    acr0|acr1|acr2) acr_official_arms "${section#acr}" ;;
    table0|table1|table2) table_arms "${section#table}" ;;
    top0|top1|top2) top_arms "${section#top}" ;;
    precision)  # bf16 + channels_last against fp32 on the same short run
      run precision/fixmatch_fp32 algorithm=fixmatch train.iterations=400 train.precision=fp32 train.channels_last=false
      run precision/fixmatch_bf16_cl algorithm=fixmatch train.iterations=400 ;;
    *) echo "unknown section $section"; exit 2 ;;
  esac
done
