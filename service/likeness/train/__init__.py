"""Stage 4: textual-inversion training and checkpoint scoring."""
