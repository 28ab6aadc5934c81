# pemworker %preun ($1: 0 = erase, 1 = upgrade). Stops the agent on erase only.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl stop pemagent.service >/dev/null 2>&1 || :
fi
exit 0
