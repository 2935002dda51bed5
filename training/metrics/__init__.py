"""Quality metrics: one file per metric, each tested against a known answer."""
