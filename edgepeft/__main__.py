from edgepeft.cli import main

main()
