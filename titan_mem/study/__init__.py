"""The continual-learning study (issue 9, in progress): `spec` reads a study file into arms, `frontier` holds
the learning-vs-forgetting arithmetic (Pareto fronts, forgetting at matched learning). The runner, report and
plots are not built yet."""
