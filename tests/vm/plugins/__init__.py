"""A package, so these modules do not share names with tests/helpers/ under pytest's
default import mode."""
