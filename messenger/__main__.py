from messenger.entry import main

main()
