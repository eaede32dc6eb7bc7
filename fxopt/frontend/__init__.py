"""fxopt.frontend: tracing, example inputs, staged compiles, module-state checks."""
