"""Sans-IO secure aggregation (Bonawitz et al. 2017; SecAgg+ graphs of Bell et al. 2020)."""
