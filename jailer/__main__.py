from jailer.cli import main

main()
