"""Worker applications that tests run as real ``taskiq worker`` subprocesses."""
