"""Lowering: turn the pass-processed SpecEE decode graph into what a runtime executes."""
