"""Scoring timed event captions ("From 0 to 4.5, a man talks. From 4.5 to 9, ...") against a data
file's answers: parsing (`segments`), the ActivityNet dense-captioning evaluator's temporal and
caption metrics (`temporal`, `captions`), and the report (`report`)."""
