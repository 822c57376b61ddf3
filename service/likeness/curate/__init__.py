"""Stage 2: curation — every image gets a decision and a reason."""
