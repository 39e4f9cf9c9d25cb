"""The LLMTIME alphabet: every character an encoded series is written with.

A module of its own, with no imports, so that counting the alphabet head's rows (:mod:`lvforecast.budget.shapes`,
``lvforecast flops``) needs neither numpy nor the codec; :mod:`lvforecast.data.encoding` holds the grammar and
re-exports :data:`ALPHABET`.
"""

ALPHABET = "0123456789.,;"
