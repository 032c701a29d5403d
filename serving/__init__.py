"""Starting and stopping the Triton server that serves our model repository."""
