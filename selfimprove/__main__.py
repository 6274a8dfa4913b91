from selfimprove.cli import main

main()
