"""fxopt.passinfra: the pass base, the pass registry and the pass manager."""
