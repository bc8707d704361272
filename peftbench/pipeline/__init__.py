"""The run pipeline: recipe -> context -> data, model, train, evaluate, export -> run record and report."""
