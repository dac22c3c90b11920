"""`python -m ssl_imwa.report`."""
import sys

from ssl_imwa.report.cli import main

sys.exit(main())
