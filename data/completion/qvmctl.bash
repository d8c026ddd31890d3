# bash completion for qvmctl (installed as .../bash-completion/completions/qvmctl)
_qvmctl() {
    local cur prev words cword
    _init_completion 2>/dev/null || {
        cur=${COMP_WORDS[COMP_CWORD]}; prev=${COMP_WORDS[COMP_CWORD-1]}
        words=("${COMP_WORDS[@]}"); cword=$COMP_CWORD
    }
    local commands="status up down reload tap cert ca forward doctor guest qemu-args guest-setup lease"
    local cmd="" i
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            --json) ;;
            --bus) ((i++)) ;;
            *) cmd=${words[i]}; break ;;
        esac
    done
    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W "$commands --json --bus --help" -- "$cur"))
        return
    fi
    local sub=${words[i+1]:-}
    case $cmd in
        tap)
            if ((cword == i + 1)); then
                COMPREPLY=($(compgen -W "create delete list" -- "$cur"))
            elif [[ $sub == create ]]; then
                COMPREPLY=($(compgen -W "--multi-queue --owner qvm0tap0 qvm0tap1 qvm0tap2" -- "$cur"))
            elif [[ $sub == delete ]]; then
                COMPREPLY=($(compgen -W "$(qvmctl tap list 2>/dev/null | awk 'NR>1 {print $1}')" -- "$cur"))
            fi ;;
        cert) ((cword == i + 1)) && COMPREPLY=($(compgen -W "list issue" -- "$cur")) ;;
        ca)
            if ((cword == i + 1)); then
                COMPREPLY=($(compgen -W "show export" -- "$cur"))
            elif [[ $sub == export ]]; then
                COMPREPLY=($(compgen -d -- "$cur"))
            fi ;;
        forward)
            if ((cword == i + 1)); then
                COMPREPLY=($(compgen -W "add remove list" -- "$cur"))
            elif ((cword == i + 2)) && [[ $sub == add || $sub == remove ]]; then
                COMPREPLY=($(compgen -W "tcp udp" -- "$cur"))
            fi ;;
        guest) ((cword == i + 1)) && COMPREPLY=($(compgen -W "list" -- "$cur")) ;;
        lease) ((cword == i + 1)) && COMPREPLY=($(compgen -W "list" -- "$cur")) ;;
        qemu-args|guest-setup)
            ((cword == i + 1)) && COMPREPLY=($(compgen -W "$(qvmctl guest list 2>/dev/null | awk 'NR>1 {print $1}')" -- "$cur")) ;;
    esac
}
complete -F _qvmctl qvmctl
