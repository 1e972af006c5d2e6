"""Tests of the Flora training path."""
