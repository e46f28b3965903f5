"""Job bodies that executors run: extract, train_saes, align, evaluate, report."""
