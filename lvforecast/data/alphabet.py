"""The LLMTIME alphabet: every character an encoded series is written with (the grammar is in
:mod:`lvforecast.data.encoding`). A module with no imports, so :mod:`lvforecast.budget.shapes` needs no numpy."""

ALPHABET = "0123456789.,;"
