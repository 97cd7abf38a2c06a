"""lmlab: Hydra-configured word-level language models (train, sweep, evaluate, generate, compare).

Data flows one way, and so do imports: a module imports only from its own layer or the layers below it,
at module level and inside functions alike (``tests/unit/test_layers.py`` holds the code to it)::

    run  evaluate  generate  compare  bench     entry points: a person's commands
    job  factory  validation                     one training job; config -> objects; a config checked
    evaluation                                   methods on a trained model, generation, the sweep's ensemble
    training                                     the loop, its step, hooks, checkpoints
    loggers                                      console, metrics.jsonl, W&B, TensorBoard
    models                                       the model contract, registry, bodies, heads, output layers
    data                                         corpus, batching, sources, datasets
    runtime                                      processes, devices, files, run records
    config                                       the schema values are checked against
    errors  registry  metrics                    leaves
"""

__version__ = "0.1.0"

# Lowest first; one layer's names are the modules or packages directly under lmlab/.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "registry", "metrics"),
    ("config",),
    ("runtime",),
    ("data",),
    ("models",),
    ("loggers",),
    ("training",),
    ("evaluation",),
    ("validation", "factory", "job"),
    ("run", "evaluate", "generate", "compare", "bench"),
)
