"""The extraction pipeline, one module per stage in the order the data flows:
probe → sample → decode → patchify (resize, patches) → audio, wired by `prepare`."""
