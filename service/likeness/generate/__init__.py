"""Stage 1: plan, render, write and import the gallery."""
