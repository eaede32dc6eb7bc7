"""fxopt.costs: the cost, engine and leaf latency models and target calibration."""
