"""Building, training and evaluating the classifiers."""
