"""Solvers: the group knapsack and the planner that turns scores and a cost model into a plan."""
