"""Routing: which requests the small local model answers and which go to the large model, and
how a router is trained and judged.

- policies.py: `Decision` and the policies the server asks at request time (local, large,
  cascade); learned.py: the learned router (logistic regression on prompt features) with its
  file format; features.py: what it reads from a prompt (MiniLM, static MiniLM, hashed n-grams).
- labels.py: answering prompts with both models and labelling them; training.py and
  evaluation.py: `slimlm router train` and `slimlm router eval` as library calls;
  curves.py: the quality-vs-escalation curve, its area, and the plot.

This package sits below serve/ (which imports the policies for each request) and beside eval/
(whose scorers grade the answers), so a router is trained and judged without a server.
"""

from slimlm.routing.curves import RATES, curve_auc, plot_curves, quality_at, random_curve, router_curve
from slimlm.routing.evaluation import evaluate_router, policy_curves
from slimlm.routing.labels import LabelSet, answer_logprobs, answerers, build_labels, label_rows
from slimlm.routing.learned import FORMAT, LearnedRouter
from slimlm.routing.policies import METRICS, CascadePolicy, Decision, LargePolicy, LocalPolicy, Policy
from slimlm.routing.training import split_rows, train_router

__all__ = ["FORMAT", "METRICS", "RATES", "CascadePolicy", "Decision", "LabelSet", "LargePolicy", "LearnedRouter",
           "LocalPolicy", "Policy", "answer_logprobs", "answerers", "build_labels", "curve_auc", "evaluate_router",
           "label_rows", "plot_curves", "policy_curves", "quality_at", "random_curve", "router_curve", "split_rows",
           "train_router"]
