"""The paper's experiment and the demos, on real data.

What lives here: the backward-compatibility experiment (its settings, :mod:`.config`; its runs,
versions trained with every strategy and consumers trained once on version 0, :mod:`.runner`;
their paired-bootstrap summaries, :mod:`.summary`; the selection and test sides of the consumer
examples, :mod:`.selection`), its per-seed checkpoints (:mod:`.checkpoint`),
``bc-fast demo`` (:mod:`.demo`: the experiment, then fusion, conversion and a legacy index on the
trained registry) and ``bc-fast demo --text`` (:mod:`.text_demo`: post-hoc adapters between real
text models). It sits at the top, below only the CLI: it may import every other subpackage.
"""

from .config import ALL_TASKS, ExperimentConfig
from .runner import run_demo, run_experiment, run_lambda_sweep
from .summary import format_comparisons, format_sweep, raw_schema, summarize

__all__ = ["ALL_TASKS", "ExperimentConfig", "format_comparisons", "format_sweep", "raw_schema", "run_demo",
           "run_experiment", "run_lambda_sweep", "summarize"]
