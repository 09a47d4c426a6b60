"""Starting and supervising one sandbox: the launcher's side (jailer.launch.launcher) and the
sandbox's first process, from its fork to the program's start (jailer.launch.setup_child)."""
