"""Runs the stages of a build, resumes and refines it; never serves."""
