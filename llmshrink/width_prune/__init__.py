"""Structured width pruning: fewer MLP channels and attention heads (whole key/value groups) in
every decoder layer, chosen by their output energy on calibration text; the result is an ordinary
transformers checkpoint with smaller widths. importance.py holds the math, apply.py edits the model."""

from .apply import MODEL_TYPES, RECORD, check_layout, plan_widths, prune_widths, unit_statistics, width_prune
from .config import WidthPruneConfig
from .importance import channel_scores, choose_widths, group_output_stats, keep_indices, parse_ranges, ranges

__all__ = ["MODEL_TYPES", "RECORD", "WidthPruneConfig", "channel_scores", "check_layout", "choose_widths",
           "group_output_stats", "keep_indices", "parse_ranges", "plan_widths", "prune_widths", "ranges",
           "unit_statistics", "width_prune"]
