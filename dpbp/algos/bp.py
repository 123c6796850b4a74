"""Plain backprop (`algo=bp`): every module forwards batch t and back-propagates it in tick t.

K = 1 is ordinary training; K > 1 is model-parallel backprop with the same numbers (module k
waits for module k+1's gradient inside the tick). The reference every speedup is measured
against.
"""

from dpbp.algorithm import AlgoConfig, Algorithm

ALGORITHM = Algorithm(
    name="bp",
    title="backpropagation (K > 1: model-parallel, the same numbers as K = 1)",
    family="tick",
    options=AlgoConfig,
    reference=True,
)
