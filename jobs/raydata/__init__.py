"""The Ray-wiring modules: the only library code that imports ray."""
