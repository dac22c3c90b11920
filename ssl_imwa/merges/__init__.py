"""The built-in merge strategies (`imwa.merge=<name>`), one module each: imported, so registered, when the
first strategy is looked up (ssl_imwa.merge's registry scans this package), exactly as a user's plugin
module named in `plugins=[...]` is. The engine imports none of them by name."""
