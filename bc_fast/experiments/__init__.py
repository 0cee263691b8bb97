"""The paper's experiment and the demos, on real data.

What lives here: the backward-compatibility experiment (versions trained with every strategy,
consumers trained once on version 0, paired-bootstrap summaries; :mod:`.runner`), its per-seed
checkpoints (:mod:`.checkpoint`), ``bc-fast demo`` (:mod:`.demo`: the experiment, then fusion,
conversion and a legacy index on the trained registry) and ``bc-fast demo --text`` (:mod:`.text_demo`:
post-hoc adapters between real text models). It sits at the top, below only the CLI: it may import
every other subpackage.
"""

from .runner import (ExperimentConfig, raw_schema, run_demo, run_experiment, run_lambda_sweep,
                     summarize)

__all__ = ["ExperimentConfig", "raw_schema", "run_demo", "run_experiment", "run_lambda_sweep", "summarize"]
