"""Evaluation: scoring primitives (`lm`), QA metrics (`metrics`), tasks (`tasks`), checkpoint loading and
task running (`runner`), and the lm-evaluation-harness adapter (`lm_eval_adapter`)."""
