"""Stand-in for the get-pip.py that ansible-test downloads from its own CI file host (which
this project's CI cannot reach): pip from the Python's own ensurepip, then that pip runs the
install ansible-test asked for (pinned packages from PyPI). scripts/ansible-check.sh puts it
where ansible-test looks for its cached copy."""

import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"], stdout=subprocess.DEVNULL)
# get-pip.py takes pip install's arguments and two of its own.
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet"] + args)
