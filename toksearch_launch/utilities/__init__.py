"""TokSearch's ``toksearch.utilities`` path."""
