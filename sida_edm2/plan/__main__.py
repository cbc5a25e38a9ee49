"""`python -m sida_edm2.plan`: the memory planner's command line (sida_edm2.plan.memory)."""

from sida_edm2.plan.memory import main

main()  # click names the command "python -m sida_edm2.plan" in the usage line
