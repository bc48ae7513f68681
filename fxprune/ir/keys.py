"""Every key fxprune writes on ``node.meta`` and ``GraphModule.meta``, with the pass that owns it.

A pass writes only its own keys and reads the keys of the passes before it; ``requires``/``ensures``
check exactly these. The payload types are the dataclasses of this package.
"""

# node.meta
VALUE_KEY = "fxprune_value"  # trace: small non-tensor results (sizes, ints) for shape-op replay
CHANNELS_KEY = "fxprune"  # dependency: NodeChannels (the node's channel spaces, its rule's notes)
SCORES_KEY = "fxprune_scores"  # score: this layer's per-channel contribution to its group's importance
LAYER_LATENCY_KEY = "fxprune_layer_latency"  # latency: LayerLatency (unit and calibrated table)

# GraphModule.meta
# capture: Capture (the path that captured the model, the inputs' and outputs' structure)
CAPTURE_KEY = "fxprune_capture"
ANALYSIS_KEY = "fxprune"  # dependency: Analysis (channel groups and every channel space)
IMPORTANCE_KEY = "fxprune_importance"  # score: Importance (criterion, one score per group channel)
COST_KEY = "fxprune_cost"  # cost: {"flops": CostModel, "params": CostModel}
LATENCY_KEY = "fxprune_latency"  # latency: LatencyCalibration; its CostModel goes under COST_KEY["latency"]
# whole-model budget (a graph captured in parts only): WholeModel (the parts' budget, their share of the model)
WHOLE_KEY = "fxprune_whole"
SOLUTION_KEY = "fxprune_solution"  # plan: Solution (the plan, its predicted cost, the closed loop's record)
PLAN_KEY = "fxprune_plan"  # rewrite: the Plan a pruned GraphModule was made with
REPORT_KEY = "fxprune_report"  # compile: the Report

META_KEY = CHANNELS_KEY  # the dependency pass's key, on nodes and on the graph module alike
