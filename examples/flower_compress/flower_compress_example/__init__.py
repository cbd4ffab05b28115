"""A plain Flower app (numpy data, a small torch MLP, FedAvg) that fedsqueeze compresses."""
