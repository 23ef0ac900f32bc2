from forgeline.cli import main

main()
