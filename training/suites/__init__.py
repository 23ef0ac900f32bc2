"""Evaluation suites as data: what a version is scored on beyond its own task's exact match.

A suite file (YAML) names a kind and its data; ``forgeline evaluate`` runs every suite of the
recipe's ``evaluate.suites`` (or ``--suite``) on the version and on its base, records the
aggregates as metrics named ``{suite}_{metric}`` (what promotion gates name) and each item's
score (what significance-aware gates compare). Kinds, one module each:

* ``task`` (`task.py`): generated answers matched exactly, by regular expression or numerically;
* ``lm_eval`` (`lm_eval_suite.py`): multiple-choice log-likelihood tasks of lm-evaluation-harness
  on local files;
* ``judge`` (`judge.py`): an LLM judge served by forgeline, pairwise against the production
  holder, both answer orders;
* ``safety`` (`safety.py`): refusal of prompts that must be refused, over-refusal of the rest.

Tool-call accuracy will be a fifth kind (``tool_calls``), scored by the tool-call parsing in
``training/`` once it exists: a spec in `spec.py` and a runner in `runner.py`'s table.
"""
