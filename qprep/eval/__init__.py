"""Scoring timed event captions ("From 0 to 4.5, a man talks. From 4.5 to 9, ...") and grounding
answers against a data file: the ground truth (`truth`), parsing (`segments`), the ActivityNet
dense-captioning evaluator's temporal and caption metrics (`temporal`, `captions`), SODA_c (`soda`),
grounding R1@m and mIoU (`grounding`), and the report (`report`)."""
