"""`python -m sida_edm2.plan`: the memory planner's command line (sida_edm2.plan.memory)."""

import sys

from sida_edm2.plan.memory import main

sys.argv[0] = "python -m sida_edm2.plan"  # the usage line names the command, not __main__.py
main()
