from chatsync.cli import main

main()
