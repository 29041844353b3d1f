"""r1v2 plan: ahead-of-time compilation of the training programs for TPU topologies."""
