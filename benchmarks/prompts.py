"""The prompts the benchmarks feed the engine, each written once under a name; a script picks
its list by name. Near-duplicates (the three village openings, the numpy imports) are kept as
they were so that the token counts behind earlier results stay the same."""

from __future__ import annotations

TEXT = {
    "fibonacci": "def fibonacci(n):",
    "quicksort": "def quicksort(arr):",
    "stack": "class Stack:\n    def __init__(self):",
    "linked-list": "class LinkedList:\n    def __init__(self):",
    "numpy": "import numpy as np\n",
    "numpy-normalize": "import numpy as np\n\ndef normalize(x):",
    "numpy-moving-average": "import numpy as np\n\ndef moving_average(x, w):",
    "binary-search": "# Binary search over a sorted list\n",
    "sql": "SELECT name, count(*) FROM users",
    "france": "The capital of France is",
    "thermodynamics": "The three laws of thermodynamics are",
    "printing-press": "The history of the printing press begins",
    "hash-map": "Explain how a hash map works.",
    "arithmetic": "Q: What is 17 * 23?\nA:",
    "lighthouse": "Write a short story about a lighthouse keeper.",
    "village": "Once upon a time, in a small village,",
    "village-no-comma": "Once upon a time in a small village,",
    "village-by-the-sea": "Once upon a time, in a small village by the sea,",
}


def prompts(*names: str) -> list[str]:
    return [TEXT[n] for n in names]
