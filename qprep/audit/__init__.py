"""Audits of a store against transformers' own processors and models (`qprep verify`)."""
