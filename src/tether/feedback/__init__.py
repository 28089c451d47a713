"""Feedback from people and judges: candidates to label (items), the label file (labels), the
labeling page's server (server), and the LM / reward-model / function judges (judge)."""
